// Package v2 is a stand-in for moby's plugin/v2 (managed plugins), which Debian's
// golang-github-docker-docker-dev does not ship. It is not moby's code.
//
// daemon/graphdriver/plugin.go imports it for one thing only, in newPluginDriver:
//
//	if !pl.IsV1() {
//		if p, ok := pl.(*v2.Plugin); ok {
//			if p.PluginObj.Config.PropagatedMount != "" { home = ... }
//
// Legacy (v1) plugins, found by pkg/plugins' discovery of /run/docker/plugins/NAME.sock
// as dockerd finds them and as the conformance tests use them, are *plugins.Plugin, whose
// IsV1() is true: that branch is never taken and no value of this type is ever made.
// Plugin therefore has only the shape plugin.go needs: the PluginObj.Config.PropagatedMount
// field path (moby's own types.Plugin) and the plugingetter.CompatPlugin methods the type
// assertion requires. The methods panic, so that any use would be loud.
package v2 // import "github.com/docker/docker/plugin/v2"

import (
	"github.com/docker/docker/api/types"
	"github.com/docker/docker/pkg/plugins"
)

// Plugin stands in for moby's v2.Plugin (see the package comment).
type Plugin struct {
	PluginObj types.Plugin `json:"plugin"`
}

const unused = "plugin/v2 stand-in: managed (v2) plugins are not supported in this build"

// Name is never called: see the package comment.
func (p *Plugin) Name() string { panic(unused) }

// ScopedPath is never called: see the package comment.
func (p *Plugin) ScopedPath(string) string { panic(unused) }

// IsV1 is never called: see the package comment.
func (p *Plugin) IsV1() bool { panic(unused) }

// Client is never called: see the package comment.
func (p *Plugin) Client() *plugins.Client { panic(unused) }

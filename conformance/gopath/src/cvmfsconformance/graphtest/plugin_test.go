//go:build linux
// +build linux

// Package graphtest runs moby's graph-driver conformance suite (daemon/graphdriver/graphtest,
// moby 20.10 as shipped by Debian) against the cvmfs-graphdriver plugin, reached exactly
// as dockerd reaches a legacy plugin: graphdriver.New -> GetDriver -> lookupPlugin ->
// pkg/plugins discovery of /run/docker/plugins/NAME.sock -> the HTTP proxy in
// daemon/graphdriver/proxy.go. The tests are those of moby's overlay2/overlay_test.go;
// the benchmarks (bench_test.go) run for the plugin and for the built-in overlay2.
//
// Environment:
//
//	CVMFS_GRAPHTEST_PLUGIN  plugin name, as in `dockerd -s NAME` (default "cvmfs")
//	CVMFS_GRAPHTEST_SOCKET  optional: fail unless discovery finds the plugin at this
//	                        socket (guards against reaching another daemon)
//
// Needs root and a running plugin daemon; scripts/graphtest.sh sets all of that up.
package graphtest

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/docker/docker/daemon/graphdriver"
	"github.com/docker/docker/daemon/graphdriver/graphtest"
	"github.com/docker/docker/pkg/idtools"
	"github.com/docker/docker/pkg/plugingetter"
	"github.com/docker/docker/pkg/plugins"
	"github.com/docker/docker/pkg/reexec"

	// The built-in reference driver, compiled in for the benchmarks (registers "overlay2").
	_ "github.com/docker/docker/daemon/graphdriver/overlay2"
)

// pluginDriver is the name graphtest's helpers are given. graphtest creates drivers with
// graphdriver.GetDriver(name, nil, ...), a nil plugin getter, so the plugin is reached
// through a registered driver whose init does what dockerd does (initPlugin).
const pluginDriver = "cvmfs-plugin-test"

func pluginName() string {
	if name := os.Getenv("CVMFS_GRAPHTEST_PLUGIN"); name != "" {
		return name
	}
	return "cvmfs"
}

func TestMain(m *testing.M) {
	// overlay2 and pkg/chrootarchive re-execute this binary for some work
	// (docker-mountfrom, docker-untar, docker-applyLayer), as they re-execute dockerd.
	if reexec.Init() {
		return
	}
	if err := graphdriver.Register(pluginDriver, initPlugin); err != nil {
		panic(err)
	}
	os.Exit(m.Run())
}

// legacyPlugins is the plugingetter.PluginGetter that dockerd's plugin store amounts to
// when no managed plugin has the name: its Get falls back to pkg/plugins.Get (v1 plugins
// found under /run/docker/plugins, /etc/docker/plugins, /usr/lib/docker/plugins).
// Only Get is used by graphdriver's plugin lookup.
type legacyPlugins struct{}

func (legacyPlugins) Get(name, capability string, _ int) (plugingetter.CompatPlugin, error) {
	p, err := plugins.Get(name, capability)
	if err != nil {
		return nil, err
	}
	if want := os.Getenv("CVMFS_GRAPHTEST_SOCKET"); want != "" && p.Addr != "unix://"+want {
		return nil, fmt.Errorf("plugin %s was found at %s, not at unix://%s", name, p.Addr, want)
	}
	return p, nil
}

func (legacyPlugins) GetAllByCap(string) ([]plugingetter.CompatPlugin, error) {
	panic("not used by graphdriver")
}

func (legacyPlugins) GetAllManagedPluginsByCap(string) []plugingetter.CompatPlugin {
	panic("not used by graphdriver")
}

func (legacyPlugins) Handle(string, func(string, *plugins.Client)) {
	panic("not used by graphdriver")
}

// initPlugin is the registered driver's InitFunc. graphdriver.GetDriver passes
// <graphtest root>/cvmfs-plugin-test as home; dockerd would pass its data-root as Root,
// so the graphtest root plays the data-root and the plugin's Init gets <root>/<plugin name>.
func initPlugin(home string, options []string, uidMaps, gidMaps []idtools.IDMap) (graphdriver.Driver, error) {
	name := pluginName()
	d, err := graphdriver.New(name, legacyPlugins{}, graphdriver.Options{
		Root:                filepath.Dir(home),
		DriverOptions:       options,
		UIDMaps:             uidMaps,
		GIDMaps:             gidMaps,
		ExperimentalEnabled: true,
	})
	if err != nil {
		// GetDriver logs the cause and answers ErrNotSupported, which graphtest turns
		// into a skip; a plugin that is not there or fails Init is a failure here.
		return nil, fmt.Errorf("graph-driver plugin %q: %v (the cause is logged above)", name, err)
	}
	return d, nil
}

// The tests of moby's overlay2/overlay_test.go, in its order. overlay2 skips
// DiffApply10Files when its kernel check chooses the naive diff, and always skips Changes
// ("naive change algorithm"); neither skip is taken over: the plugin must pass both.
// Setup creates the driver the following tests share; Teardown calls its Cleanup.

func TestSetup(t *testing.T) {
	graphtest.GetDriver(t, pluginDriver)
}

func TestCreateEmpty(t *testing.T) {
	graphtest.DriverTestCreateEmpty(t, pluginDriver)
}

func TestCreateBase(t *testing.T) {
	graphtest.DriverTestCreateBase(t, pluginDriver)
}

func TestCreateSnap(t *testing.T) {
	graphtest.DriverTestCreateSnap(t, pluginDriver)
}

func Test128LayerRead(t *testing.T) {
	graphtest.DriverTestDeepLayerRead(t, 128, pluginDriver)
}

func TestDiffApply10Files(t *testing.T) {
	graphtest.DriverTestDiffApply(t, 10, pluginDriver)
}

func TestChanges(t *testing.T) {
	graphtest.DriverTestChanges(t, pluginDriver)
}

func TestTeardown(t *testing.T) {
	graphtest.PutDriver(t)
}

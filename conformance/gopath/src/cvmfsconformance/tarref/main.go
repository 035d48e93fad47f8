// Command tarref writes to stdout exactly the tar stream that moby's overlay2 graph
// driver returns from Diff(id, parent) when parent is id's direct parent (the "native"
// diff), for the upper directory DIR (overlay2's <home>/<id>/diff), and nothing else.
//
//	tarref [-uidmap C:H:N]... [-gidmap C:H:N]... DIR
//
// It is the reference for byte-identity tests of the cvmfs graph driver's Diff. It is
// built in GOPATH mode from Debian's golang-github-docker-docker-dev (moby 20.10.24, the
// same sources as Debian 12's docker.io) and Debian's Go standard library archive/tar,
// so it runs the very code dockerd's overlay2 driver runs:
//
//	// daemon/graphdriver/overlay2/overlay.go, (*Driver).Diff
//	return archive.TarWithOptions(diffPath, &archive.TarOptions{
//		Compression:    archive.Uncompressed,
//		UIDMaps:        d.uidMaps,
//		GIDMaps:        d.gidMaps,
//		WhiteoutFormat: archive.OverlayWhiteoutFormat,
//	})
//
// d.uidMaps/d.gidMaps are the daemon's user-namespace remapping (--userns-remap); they
// are nil on a daemon without remapping, which is what tarref uses unless -uidmap/-gidmap
// are given (same fields as the graph-driver protocol's Init: container_id:host_id:size).
//
// TarWithOptions does not report errors: it logs them (logrus, to stderr) and leaves the
// entry out, e.g. "Can't add file ... archive/tar: sockets not supported" for a unix
// socket. tarref passes that through: stderr carries moby's log lines, stdout the tar.
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"github.com/docker/docker/pkg/archive"
	"github.com/docker/docker/pkg/idtools"
)

type idMaps []idtools.IDMap

func (m *idMaps) String() string { return fmt.Sprint(*m) }

func (m *idMaps) Set(v string) error {
	parts := strings.Split(v, ":")
	if len(parts) != 3 {
		return fmt.Errorf("want container_id:host_id:size, got %q", v)
	}
	var n [3]int
	for i, p := range parts {
		x, err := strconv.Atoi(p)
		if err != nil {
			return fmt.Errorf("want container_id:host_id:size, got %q", v)
		}
		n[i] = x
	}
	*m = append(*m, idtools.IDMap{ContainerID: n[0], HostID: n[1], Size: n[2]})
	return nil
}

func main() {
	var uidMaps, gidMaps idMaps
	flag.Var(&uidMaps, "uidmap", "a UID map entry container_id:host_id:size (repeatable)")
	flag.Var(&gidMaps, "gidmap", "a GID map entry container_id:host_id:size (repeatable)")
	flag.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: %s [-uidmap C:H:N]... [-gidmap C:H:N]... DIR\n"+
			"writes overlay2's native Diff tar of upper dir DIR to stdout\n", os.Args[0])
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	dir := flag.Arg(0)
	// TarWithOptions on a missing DIR silently yields an empty archive; refuse instead.
	if fi, err := os.Lstat(dir); err != nil || !fi.IsDir() {
		fmt.Fprintf(os.Stderr, "tarref: %s is not a directory\n", dir)
		os.Exit(2)
	}

	// nil, not empty, maps when none are given: exactly what overlay2 passes.
	var um, gm []idtools.IDMap
	if len(uidMaps) > 0 {
		um = uidMaps
	}
	if len(gidMaps) > 0 {
		gm = gidMaps
	}
	rc, err := archive.TarWithOptions(dir, &archive.TarOptions{
		Compression:    archive.Uncompressed,
		UIDMaps:        um,
		GIDMaps:        gm,
		WhiteoutFormat: archive.OverlayWhiteoutFormat,
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "tarref: %v\n", err)
		os.Exit(1)
	}
	defer rc.Close()
	if _, err := io.Copy(os.Stdout, rc); err != nil {
		fmt.Fprintf(os.Stderr, "tarref: writing the tar: %v\n", err)
		os.Exit(1)
	}
}

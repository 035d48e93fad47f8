//go:build linux
// +build linux

package graphtest

import (
	"testing"

	"github.com/docker/docker/daemon/graphdriver/graphtest"
)

// The benchmarks of moby's overlay2/overlay_test.go, each run for the plugin and then for
// the built-in overlay2 in the same binary: BenchmarkX/driver=cvmfs, BenchmarkX/driver=overlay2.
// As upstream, every run sets up a new driver (new home under $TMPDIR) and cleans it up.
//
// overlay2 runs as dockerd runs it: layers are untarred in a re-executed child in a chroot
// (pkg/chrootarchive). overlay_test.go swaps that for in-process untar, through a
// package-private variable this package cannot set; the plugin's figures include its own
// extraction and the HTTP round trips, so this is the like-for-like comparison.

var benchDrivers = []struct{ label, name string }{
	{"cvmfs", pluginDriver},
	{"overlay2", "overlay2"},
}

func benchBoth(b *testing.B, bench func(b *testing.B, driver string)) {
	for _, d := range benchDrivers {
		d := d
		b.Run("driver="+d.label, func(b *testing.B) { bench(b, d.name) })
	}
}

func BenchmarkExists(b *testing.B) {
	benchBoth(b, func(b *testing.B, d string) { graphtest.DriverBenchExists(b, d) })
}

func BenchmarkGetEmpty(b *testing.B) {
	benchBoth(b, func(b *testing.B, d string) { graphtest.DriverBenchGetEmpty(b, d) })
}

func BenchmarkDiffBase(b *testing.B) {
	benchBoth(b, func(b *testing.B, d string) { graphtest.DriverBenchDiffBase(b, d) })
}

func BenchmarkDiffSmallUpper(b *testing.B) {
	benchBoth(b, func(b *testing.B, d string) { graphtest.DriverBenchDiffN(b, 10, 10, d) })
}

func BenchmarkDiff10KFileUpper(b *testing.B) {
	benchBoth(b, func(b *testing.B, d string) { graphtest.DriverBenchDiffN(b, 10, 10000, d) })
}

func BenchmarkDiff10KFilesBottom(b *testing.B) {
	benchBoth(b, func(b *testing.B, d string) { graphtest.DriverBenchDiffN(b, 10000, 10, d) })
}

func BenchmarkDiffApply100(b *testing.B) {
	benchBoth(b, func(b *testing.B, d string) { graphtest.DriverBenchDiffApplyN(b, 100, d) })
}

func BenchmarkDiff20Layers(b *testing.B) {
	benchBoth(b, func(b *testing.B, d string) { graphtest.DriverBenchDeepLayerDiff(b, 20, d) })
}

func BenchmarkRead20Layers(b *testing.B) {
	benchBoth(b, func(b *testing.B, d string) { graphtest.DriverBenchDeepLayerRead(b, 20, d) })
}

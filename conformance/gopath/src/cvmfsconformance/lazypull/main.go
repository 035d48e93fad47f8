// lazypull pulls an image into containerd as Docker >= 24 (on the containerd image
// store), nerdctl and the CRI pull: every layer descriptor carries the remote-snapshotter
// annotations (containerd's snapshotters.AppendInfoHandlerWrapper), so a snapshotter can
// answer Prepare with AlreadyExists and containerd then never fetches that layer's blob.
// `ctr image pull` does not add them (containerd issue 11082).
//
//	lazypull [-address SOCK] [-namespace NS] [-snapshotter NAME] [-plain-http] REF
//
// Prints the image name and its manifest digest.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/pkg/snapshotters"
	"github.com/containerd/containerd/remotes/docker"
	"github.com/containerd/containerd/remotes/docker/config"
)

func main() {
	address := flag.String("address", "/run/containerd/containerd.sock", "containerd's socket")
	ns := flag.String("namespace", "default", "containerd namespace")
	snapshotter := flag.String("snapshotter", "cvmfs", "snapshotter to unpack into")
	plainHTTP := flag.Bool("plain-http", false, "talk HTTP to the registry (a local test registry)")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: lazypull [flags] REF")
		os.Exit(2)
	}
	ref := flag.Arg(0)

	client, err := containerd.New(*address)
	if err != nil {
		fmt.Fprintf(os.Stderr, "lazypull: connect to %s: %v\n", *address, err)
		os.Exit(1)
	}
	defer client.Close()

	hostOptions := config.HostOptions{}
	if *plainHTTP {
		hostOptions.DefaultScheme = "http"
	}
	resolver := docker.NewResolver(docker.ResolverOptions{Hosts: config.ConfigureHosts(context.Background(), hostOptions)})

	ctx := namespaces.WithNamespace(context.Background(), *ns)
	img, err := client.Pull(ctx, ref,
		containerd.WithPullUnpack,
		containerd.WithPullSnapshotter(*snapshotter),
		containerd.WithResolver(resolver),
		containerd.WithImageHandlerWrapper(snapshotters.AppendInfoHandlerWrapper(ref)),
	)
	if err != nil {
		fmt.Fprintf(os.Stderr, "lazypull: pull %s: %v\n", ref, err)
		os.Exit(1)
	}
	fmt.Println(img.Name(), img.Target().Digest)
}

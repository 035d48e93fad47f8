"""The containerd snapshotter face of the daemon: containerd's Snapshots gRPC API over an
overlayfs snapshotter with containerd's own semantics (`cvmfs-graphdriver snapshotter`).

Modules, from the bottom up: `filters` (containerd's filter syntax), `errdefs` (error
classes), `layout` (paths under the home), `metastore` (SQLite metadata), `mountspec`
(the mounts containerd is given), `overlay` (the snapshotter), `service` (gRPC servicer
and daemon; the only module that imports grpc, with the generated stubs in `api/`).

The graph-driver face never imports this package: grpcio and protobuf are needed only
here (the `snapshotter` extra).
"""

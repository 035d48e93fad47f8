// Package quota is a stand-in for moby's quota package (XFS project quotas), which
// Debian's golang-github-docker-docker-dev does not ship. It is not moby's code.
//
// It behaves as moby's own quota/projectquota_unsupported.go, i.e. as a dockerd built with
// the `exclude_disk_quota` tag: no filesystem supports project quotas. Who uses it here:
//   - overlay2 asks for a quota Control only when its backing filesystem is xfs
//     (overlay2/overlay.go, Init), and needs one only for the `overlay2.size` storage
//     option, which neither the tests nor the benchmarks pass. On ext4 (CI) the code is
//     not even reached; on xfs, overlay2 runs without project quotas.
//   - graphtest refers to ErrQuotaNotSupported in DriverTestSetQuota only, which neither
//     overlay2's test file nor ours runs.
package quota // import "github.com/docker/docker/quota"

import "github.com/docker/docker/errdefs"

// Quota limit params, as moby's (only a hard limit on blocks).
type Quota struct {
	Size uint64
}

// Control applies project quotas to directories; never made by this stand-in.
type Control struct{}

var _ errdefs.ErrNotImplemented = (*errQuotaNotSupported)(nil)

// ErrQuotaNotSupported is what every call returns, with moby's text.
var ErrQuotaNotSupported = errQuotaNotSupported{}

type errQuotaNotSupported struct{}

func (e errQuotaNotSupported) NotImplemented() {}

func (e errQuotaNotSupported) Error() string {
	return "Filesystem does not support, or has not enabled quotas"
}

// NewControl always fails: project quotas are not supported (see the package comment).
func NewControl(basePath string) (*Control, error) {
	return nil, ErrQuotaNotSupported
}

// SetQuota always fails: project quotas are not supported.
func (q *Control) SetQuota(targetPath string, quota Quota) error {
	return ErrQuotaNotSupported
}

// GetQuota always fails: project quotas are not supported.
func (q *Control) GetQuota(targetPath string, quota *Quota) error {
	return ErrQuotaNotSupported
}

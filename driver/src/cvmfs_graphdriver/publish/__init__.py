"""`cvmfs-thin`: turn images into thin images and publish their layers."""

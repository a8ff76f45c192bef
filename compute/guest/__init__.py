"""The micro-VM guest: Debian's cloud kernel and the project's busybox initramfs."""

"""The NVMe-oF host side of a GPU node: nvme-cli connect and disconnect (nvme.py) and the
sysfs readers that find a subsystem's controllers, path states and block device (sysfs.py).
"""

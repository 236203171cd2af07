"""Node-local side effects: nvmet configfs, LVM, the NVMe host side, assembly, RDMA, the agent."""

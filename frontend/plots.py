"""What the usage plots of the workload, host and dashboard pages draw (frontend/static/frontend/plots.js)."""

from __future__ import annotations

# Each plot: (key, title, unit, the history's sources, their labels).
WORKLOAD_PLOTS = [
    ("cpu", "CPU (cores)", "cores", "cpu_seconds", "CPU"),
    ("memory", "Memory", "bytes", "memory_bytes", "in use"),
    ("network", "Network", "rate", "net_rx_bytes,net_tx_bytes", "received,sent"),
    ("disk", "Disk", "rate", "block_read_bytes,block_write_bytes", "read,written"),
]
HOST_PLOTS = [
    ("cpu", "CPU (cores busy)", "cores", "cpu_seconds", "busy"),
    ("memory", "Memory", "bytes", "memory_used_bytes,allocated_memory_bytes", "used,allocated"),
    ("workloads", "Workloads running", "count", "workloads_running", "running"),
]
TENANT_PLOTS = [
    ("cpu", "CPU (cores)", "cores", "cpu_cores", "CPU"),
    ("memory", "Memory", "bytes", "memory_bytes", "in use"),
    ("workloads", "Workloads running", "count", "workloads_running", "running"),
]

"""Device catalog, links and topology files."""

from distree.targets.catalog import device_names, get_device, host_device, list_devices, target_summary
from distree.targets.spec import DEFAULT_LINK, DeviceSpec, LinkSpec, Topology
from distree.targets.topology import load_topology, parse_host_port, topology_for, topology_from_dict, \
    topology_from_flags

__all__ = [
    "DEFAULT_LINK", "DeviceSpec", "LinkSpec", "Topology", "device_names", "get_device", "host_device",
    "list_devices", "load_topology", "parse_host_port", "target_summary", "topology_for", "topology_from_dict",
    "topology_from_flags",
]

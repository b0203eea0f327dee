"""Device catalog, links and topology files."""

from distree.lazy import lazy_exports

__all__ = lazy_exports(__name__, {
    **dict.fromkeys(("device_names", "get_device", "host_device", "list_devices", "target_summary"), "catalog"),
    "DEFAULT_LINK": "spec", "DeviceSpec": "spec", "LinkSpec": "spec", "Topology": "spec",
    **dict.fromkeys(("load_topology", "parse_host_port", "topology_for", "topology_from_dict",
                     "topology_from_flags"), "topology")})

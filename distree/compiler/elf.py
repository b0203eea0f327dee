"""Just enough ELF reading to check a cross-compiled library on a machine that cannot load it."""

from __future__ import annotations

import struct
from pathlib import Path

from distree.errors import DistreeError

MACHINES = {62: "x86_64", 183: "aarch64", 40: "arm"}
_SHT_SYMTAB, _SHT_DYNAMIC, _SHT_DYNSYM = 2, 6, 11
_DT_NEEDED = 1


def elf_machine(path: Path) -> str:
    """``x86_64`` / ``aarch64`` / ... for a 64-bit little-endian ELF file; DistreeError otherwise."""
    head = Path(path).read_bytes()[:20]
    if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
        raise DistreeError(f"{path}: not a 64-bit little-endian ELF library; rebuild the bundle")
    (machine,) = struct.unpack_from("<H", head, 18)
    return MACHINES.get(machine, f"machine {machine}")


def _sections(data: bytes) -> list[tuple]:
    """Section headers (name, type, flags, addr, offset, size, link, info, addralign, entsize)."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    return [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]


def _string(data: bytes, start: int) -> str:
    return data[start:data.index(b"\0", start)].decode()


def needed_libraries(path: Path) -> tuple[str, ...]:
    """The shared libraries a library links (its DT_NEEDED entries), as the dynamic loader will look for them."""
    data = Path(path).read_bytes()
    sections = _sections(data)
    needed = []
    for sh in sections:
        if sh[1] != _SHT_DYNAMIC:
            continue
        strtab = sections[sh[6]]
        for off in range(sh[4], sh[4] + sh[5], 16):
            tag, value = struct.unpack_from("<qQ", data, off)
            if tag == _DT_NEEDED:
                needed.append(_string(data, strtab[4] + value))
    return tuple(needed)


def symbol_bytes(path: Path, name: str) -> bytes:
    """The bytes of data symbol ``name`` (from the symbol tables and section headers)."""
    data = Path(path).read_bytes()
    sections = _sections(data)
    wanted = name.encode()
    for sh in sections:
        if sh[1] not in (_SHT_SYMTAB, _SHT_DYNSYM):
            continue
        strtab = sections[sh[6]]
        for off in range(sh[4], sh[4] + sh[5], 24):
            st_name, _info, _other, st_shndx, st_value, st_size = struct.unpack_from("<IBBHQQ", data, off)
            start = strtab[4] + st_name
            if data[start:data.index(b"\0", start)] != wanted or st_shndx == 0:
                continue
            sec = sections[st_shndx]
            file_off = sec[4] + (st_value - sec[3])
            return data[file_off:file_off + st_size]
    raise DistreeError(f"{path}: has no symbol {name}; it is not a TVM library, rebuild the bundle")

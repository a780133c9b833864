#!/usr/bin/env python3
"""Where a pinned BPF program spends its time, by source line.

Usage (root):  bpf_hot_lines.py PINNED_PROG PERF_DATA [N]

PERF_DATA is a `perf record -a` taken while the program ran (e.g. under `bpftool prog run ... repeat 30000001`).
The script reads the program's jited line info (BPF_OBJ_GET_INFO_BY_FD: which jited address starts which xlated
instruction), maps every perf sample inside the program to its instruction, and prints the N hottest instructions
with the source line `bpftool prog dump xlated linum` gives them. It needs neither libbfd nor a disassembler, which
this machine's bpftool lacks. A sample right after a helper call is the call's cost (the return path).
"""
import bisect
import collections
import ctypes
import os
import re
import struct
import subprocess
import sys

SYS_BPF = 321
BPF_OBJ_GET, BPF_OBJ_GET_INFO_BY_FD = 7, 15
INFO_SIZE = 256
libc = ctypes.CDLL(None, use_errno=True)


def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    if libc.syscall(SYS_BPF, cmd, buf, 128) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def prog_fd(path):
    p = ctypes.create_string_buffer(path.encode())
    buf = ctypes.create_string_buffer(struct.pack("QII", ctypes.addressof(p), 0, 0), 128)
    fd = libc.syscall(SYS_BPF, BPF_OBJ_GET, buf, 128)
    if fd < 0:
        raise OSError(ctypes.get_errno(), f"BPF_OBJ_GET {path}")
    return fd


def info(fd, req=b"\0" * INFO_SIZE):
    out = ctypes.create_string_buffer(req, INFO_SIZE)
    bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("IIQ", fd, INFO_SIZE, ctypes.addressof(out)))
    return out.raw


def line_starts(fd):
    """(jited address, xlated instruction index) of every line info record, sorted by address."""
    raw = info(fd)
    # struct bpf_prog_info offsets (linux/bpf.h): nr_line_info 148, line_info 152, jited_line_info 160,
    # nr_jited_line_info 168, line_info_rec_size 172, jited_line_info_rec_size 176.
    nline = struct.unpack_from("I", raw, 148)[0]
    lrec, jrec = struct.unpack_from("II", raw, 172)
    lines = ctypes.create_string_buffer(lrec * nline)
    jlines = ctypes.create_string_buffer(jrec * nline)
    req = bytearray(INFO_SIZE)
    struct.pack_into("I", req, 148, nline)
    struct.pack_into("Q", req, 152, ctypes.addressof(lines))
    struct.pack_into("Q", req, 160, ctypes.addressof(jlines))
    struct.pack_into("I", req, 168, nline)
    struct.pack_into("II", req, 172, lrec, jrec)
    info(fd, bytes(req))
    starts = []
    for i in range(nline):
        insn = struct.unpack_from("I", lines.raw, i * lrec)[0]
        addr = struct.unpack_from("Q", jlines.raw, i * jrec)[0]
        starts.append((addr, insn))
    return sorted(starts)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    pinned, perf_data = sys.argv[1], sys.argv[2]
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 15
    starts = line_starts(prog_fd(pinned))
    addrs = [a for a, _ in starts]
    name = subprocess.run(["bpftool", "prog", "show", "pinned", pinned], capture_output=True, text=True).stdout
    name = name.split("name ")[1].split()[0]
    script = subprocess.run(["perf", "script", "-i", perf_data, "-F", "ip,sym"], capture_output=True, text=True)
    hits = collections.Counter()
    for line in script.stdout.splitlines():
        if name not in line:
            continue
        ip = int(line.split()[0], 16)
        k = bisect.bisect_right(addrs, ip) - 1
        if k >= 0:
            hits[starts[k][1]] += 1
    xlated = subprocess.run(["bpftool", "prog", "dump", "xlated", "pinned", pinned, "linum"], capture_output=True,
                            text=True).stdout.splitlines()
    source, text, current = {}, {}, None
    for line in xlated:
        m = re.match(r"\s*;\s*(.*)", line)
        if m:
            current = m.group(1)
            continue
        m = re.match(r"\s*(\d+): (.*)", line)
        if m:
            source[int(m.group(1))] = current
            text[int(m.group(1))] = m.group(2)
    total = sum(hits.values()) or 1
    print(f"{total} samples in {name}")
    for insn, n in hits.most_common(top):
        print(f"{100 * n / total:5.1f}%  insn {insn}: {text.get(insn, '?')[:70]}")
        print(f"        {(source.get(insn) or '?')[:150]}")


if __name__ == "__main__":
    main()

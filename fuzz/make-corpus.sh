#!/usr/bin/env bash
# Generates the seed corpora of the fuzz targets with qemu-img and qemu-io:
#   corpus/qcow2_open_read/  small whole images of many kinds
#   corpus/qcow2_header/     the first 4 KiB of each
#   corpus/qcow2_model/      random operation lists (any bytes decode to a valid one)
#   corpus/nbd_server/       NBD client streams
#   corpus/vpc_open_read/    small VHD images (qemu-img's, and small-block ones made here)
#   corpus/vdi_open_read/    small VDI images (qemu-img's, empty and with a block)
#   corpus/qcow1_open_read/  small qcow (version 1) images: plain, compressed, with a backing name
#   corpus/bochs_open_read/  Bochs growing images (written here: qemu-img cannot)
#   corpus/cloop_open_read/  cloop images (written here: qemu-img cannot)
#   corpus/vhdx_open_read/   patch lists over the target's own VHDX template (see the target)
#   corpus/qed_open_read/    small QED images (qemu-img's: 4 KiB clusters, two-cluster tables,
#                            zero clusters, a raw backing file name, a need-check bit set)
#   corpus/vmdk_open_read/   small VMDK files (qemu-img's sparse, stream and descriptor files,
#                            and a VMware-style stream and a COWD extent made here)
#   corpus/parallels_open_read/  small Parallels images (qemu-img's, 512 B to 64 KiB clusters;
#                            made here: left in use, a duplicate BAT entry, the original magic)
#   corpus/dmg_open_read/    small DMG images (written here: qemu-img cannot): raw, zero, zlib,
#                            bzip2 and LZFSE chunks, tables in a property list or resource fork
# Nothing here is committed (see .gitignore); run it before `cargo fuzz run`.
set -euo pipefail

cd "$(dirname "$0")"

# qcow2_model decodes any input into creation options and operations; random seeds of a few
# sizes (the bigger, the more operations) get it past tiny inputs at once.
model=corpus/qcow2_model
mkdir -p "$model"
for i in $(seq 1 24); do
    [ -e "$model/seed$i" ] || head -c $((64 + i * 60)) /dev/urandom > "$model/seed$i"
done

# nbd_server: client streams. Mode byte 1 (canned handshake first) with request sequences,
# mode 0 with a whole handshake of its own.
nbd=corpus/nbd_server
mkdir -p "$nbd"
python3 - "$nbd" <<'PY'
import os, struct, sys
out = sys.argv[1]
def req(typ, off, ln, flags=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQI", 0x25609513, flags, typ, cookie, off, ln) + payload
def opt(o, data=b""):
    return struct.pack(">QII", 0x49484156454F5054, o, len(data)) + data
seeds = {
    "rw": b"\x01" + req(1, 4096, 8, payload=b"ABCDEFGH") + req(0, 0, 16384) + req(2, 0, 0),
    "status": b"\x01" + req(6, 0, 65536) + req(7, 0, 1 << 22, cookie=2) + req(7, 100, 9000, 8, 3),
    "mixed": b"\x03" + req(1, 0, 512, 1, 1, b"z" * 512) + req(4, 0, 4096) + req(3, 0, 0)
        + req(5, 0, 4096) + req(6, 8192, 8192, 2) + req(0, 4190000, 4304),
    "handshake": b"\x00" + struct.pack(">I", 3) + opt(8) + opt(3) + opt(6, struct.pack(">I", 0) + struct.pack(">HH", 1, 1))
        + opt(9, struct.pack(">II", 0, 0)) + opt(7, struct.pack(">IH", 0, 0)) + req(0, 0, 512),
    "export_name": b"\x00" + struct.pack(">I", 1) + opt(1) + req(0, 0, 512) + req(2, 0, 0),
}
for name, data in seeds.items():
    path = os.path.join(out, name)
    if not os.path.exists(path):
        open(path, "wb").write(data)
PY

for tool in qemu-img qemu-io; do
    command -v "$tool" >/dev/null || { echo "make-corpus.sh: $tool not found (apt-get install qemu-utils)" >&2; exit 1; }
done

out=corpus/qcow2_open_read
hdr=corpus/qcow2_header
mkdir -p "$out" "$hdr"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

img() { qemu-img create -q -f qcow2 "$@"; }
io() { local f=$1; shift; local args=(); for c in "$@"; do args+=(-c "$c"); done; qemu-io -f qcow2 "${args[@]}" "$f" >/dev/null; }

# Raw source with a few patterned, zero and random ranges, for convert -c.
qemu-img create -q -f raw "$work/src.raw" 256K
qemu-io -f raw -c 'write -P 0x11 0 12k' -c 'write -P 0x22 64k 4k' -c 'write -P 0x5a 200k 20k' "$work/src.raw" >/dev/null
head -c 8192 /dev/urandom | dd of="$work/src.raw" bs=1 seek=$((128 * 1024)) conv=notrunc status=none

# v3, 512-byte clusters: data, zero clusters, a discarded range.
img -o cluster_size=512 "$work/c512.qcow2" 1M
io "$work/c512.qcow2" 'write -P 0xab 0 1536' 'write -z 4k 1k' 'write -P 0xcd 900k 3k' 'discard 900k 512'

# Compressed (deflate), 4 KiB clusters.
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4k "$work/src.raw" "$work/deflate.qcow2"

# Compressed (zstd), 4 KiB clusters.
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4k,compression_type=zstd "$work/src.raw" "$work/zstd.qcow2"

# Extended L2 entries, 16 KiB clusters (512-byte subclusters): partial writes, zeroes.
img -o cluster_size=16k,extended_l2=on "$work/extl2.qcow2" 1M
io "$work/extl2.qcow2" 'write -P 0x33 0 512' 'write -P 0x44 3k 1k' 'write -z 16k 2k' 'write -P 0x55 48k 16k'

# Extended L2 with zstd-compressed clusters.
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=16k,extended_l2=on,compression_type=zstd "$work/src.raw" "$work/extl2-zstd.qcow2"

# Version 2 (compat 0.10).
img -o compat=0.10,cluster_size=4k "$work/v2.qcow2" 1M
io "$work/v2.qcow2" 'write -P 0x66 8k 8k'

# Internal snapshots (v3 and v2).
img -o cluster_size=4k "$work/snap.qcow2" 512K
io "$work/snap.qcow2" 'write -P 0x77 0 8k'
qemu-img snapshot -c first "$work/snap.qcow2"
io "$work/snap.qcow2" 'write -P 0x78 4k 8k'
qemu-img snapshot -c second "$work/snap.qcow2"
img -o compat=0.10,cluster_size=4k "$work/snap-v2.qcow2" 512K
io "$work/snap-v2.qcow2" 'write -P 0x79 0 4k'
qemu-img snapshot -c s "$work/snap-v2.qcow2"

# Refcount widths, lazy refcounts, preallocated metadata.
img -o cluster_size=4k,refcount_bits=1 "$work/rc1.qcow2" 256K
io "$work/rc1.qcow2" 'write -P 0x81 0 4k'
img -o cluster_size=4k,refcount_bits=64,lazy_refcounts=on "$work/rc64.qcow2" 256K
io "$work/rc64.qcow2" 'write -P 0x82 0 4k'
img -o cluster_size=4k,preallocation=metadata "$work/prealloc.qcow2" 64K

# A backing file (relative name and format) and an external data file.
img -o cluster_size=4k "$work/base.qcow2" 256K
io "$work/base.qcow2" 'write -P 0x91 0 8k'
img -o cluster_size=4k -b base.qcow2 -F qcow2 "$work/overlay.qcow2"
io "$work/overlay.qcow2" 'write -P 0x92 4k 4k'
img -o cluster_size=4k,data_file="$work/data.raw" "$work/datafile.qcow2" 256K
io "$work/datafile.qcow2" 'write -P 0x93 0 8k'

# A persistent bitmap.
img -o cluster_size=4k "$work/bitmap.qcow2" 256K
qemu-img bitmap --add "$work/bitmap.qcow2" bm0

n=0
for f in "$work"/*.qcow2; do
    name=$(basename "$f" .qcow2)
    cp "$f" "$out/$name"
    head -c 4096 "$f" > "$hdr/$name"
    n=$((n + 1))
done
echo "make-corpus.sh: $n images in $out (largest $(ls -S "$out" | head -1): $(stat -c %s "$out/$(ls -S "$out" | head -1)") bytes)"

# vpc_open_read: qemu-img's empty dynamic and small fixed images, and dynamic and
# differencing images with 4 KiB blocks (qemu-img always uses 2 MiB), written here from the
# VHD specification.
vpc=corpus/vpc_open_read
mkdir -p "$vpc"
qemu-img create -q -f vpc "$work/empty.vhd" 1M
qemu-img create -q -f vpc -o subformat=fixed "$work/fixed.vhd" 32K
qemu-io -f vpc -c 'write -P 0x5a 0 4k' "$work/fixed.vhd" >/dev/null
cp "$work/empty.vhd" "$vpc/empty"
cp "$work/fixed.vhd" "$vpc/fixed"
python3 - "$vpc" <<'PY'
import os, struct, sys
out = sys.argv[1]
def csum(b, at):
    b = bytearray(b); b[at:at + 4] = b"\0" * 4
    return struct.pack(">I", ~sum(b) & 0xffffffff)
def footer(kind, size):
    f = bytearray(512)
    f[0:8] = b"conectix"; f[8:12] = struct.pack(">I", 2); f[12:16] = struct.pack(">I", 0x10000)
    f[16:24] = struct.pack(">Q", 512); f[28:32] = b"qem2"; f[36:40] = b"Wi2k"
    f[40:56] = struct.pack(">QQ", size, size); f[56:60] = struct.pack(">HBB", 65535, 16, 255)
    f[60:64] = struct.pack(">I", kind); f[68:84] = bytes(range(16))
    f[64:68] = csum(f, 64)
    return bytes(f)
def image(kind, locator=b""):
    size, block = 64 * 1024, 4096
    entries = size // block
    h = bytearray(1024)
    h[0:8] = b"cxsparse"; h[8:16] = b"\xff" * 8
    loc_at = 1536; bat_at = loc_at + (512 if locator else 0)
    h[16:24] = struct.pack(">Q", bat_at); h[24:28] = struct.pack(">I", 0x10000)
    h[28:32] = struct.pack(">I", entries); h[32:36] = struct.pack(">I", block)
    if locator:
        h[40:56] = bytes(range(16, 32))
        h[576:600] = b"W2ru" + struct.pack(">III", 512, len(locator), 0) + struct.pack(">Q", loc_at)
    h[36:40] = csum(h, 36)
    bat = [0xffffffff] * entries
    blocks = bytearray()
    first = (bat_at + entries * 4 + 511) // 512
    for i, (b, fill) in enumerate([(0, 0x11), (5, 0x22)]):
        bat[b] = first + i * (1 + block // 512)
        bitmap = bytearray(512); bitmap[0] = 0xff if kind == 3 else 0xf0
        blocks += bitmap + bytes([fill]) * block
    body = footer(kind, size) + bytes(h) + locator.ljust(512 if locator else 0, b"\0")
    body += struct.pack(">%dI" % entries, *bat)
    body = body.ljust(first * 512, b"\xff") + blocks + footer(kind, size)
    return body
seeds = {"dynamic4k": image(3), "diff4k": image(4, "base.vhd".encode("utf-16-le"))}
for name, data in seeds.items():
    path = os.path.join(out, name)
    if not os.path.exists(path):
        open(path, "wb").write(data)
PY
echo "make-corpus.sh: $(ls "$vpc" | wc -l) images in $vpc"

# vmdk_open_read: qemu-img's sparse and stream files with a little data (small grains are
# not possible with qemu-img: its grains are 64 KiB), a flat descriptor, and, written here
# from the format's documentation, a VMware stream with its footer and a COWD descriptor
# whose extent is the same input (the target resolves every extent to the input).
vmdk=corpus/vmdk_open_read
mkdir -p "$vmdk"
qemu-img create -q -f vmdk "$work/sparse.vmdk" 1M
qemu-io -f vmdk -c 'write -P 0x5a 0 4k' -c 'write -P 0x6b 512k 4k' "$work/sparse.vmdk" >/dev/null
qemu-img create -q -f vmdk -o zeroed_grain=on "$work/zeroed.vmdk" 256K
qemu-io -f vmdk -c 'write -P 1 0 4k' -c 'write -z 64k 64k' "$work/zeroed.vmdk" >/dev/null
head -c 196608 /dev/urandom | tr '\000-\377' '\000-\017' > "$work/low.raw"
qemu-img convert -f raw -O vmdk -o subformat=streamOptimized "$work/low.raw" "$work/stream.vmdk"
qemu-img create -q -f vmdk -o subformat=monolithicFlat "$work/flat.vmdk" 64K
for f in sparse zeroed stream flat; do
    cp "$work/$f.vmdk" "$vmdk/$f"
done
python3 - "$vmdk" "$work/stream.vmdk" <<'PY'
import os, struct, sys
out, qstream = sys.argv[1], sys.argv[2]
# The first compressed grain of qemu-img's stream, reused as a VMware stream's only grain.
q = open(qstream, "rb").read()
gd = struct.unpack_from("<Q", q, 56)[0]
gt = struct.unpack_from("<I", q, gd * 512)[0]
g0 = struct.unpack_from("<I", q, gt * 512)[0]
size = struct.unpack_from("<I", q, g0 * 512 + 8)[0]
grain = q[g0 * 512: g0 * 512 + 12 + size]
def header(gd_off):
    h = bytearray(512)
    h[0:4] = b"KDMV"
    struct.pack_into("<IIQQQQIQQQ", h, 4, 3, 0x30001, 128, 128, 1, 2, 512, 0, gd_off, 3)
    h[73:77] = b"\n \r\n"; struct.pack_into("<H", h, 77, 1)
    return bytes(h)
desc = b'# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType="streamOptimized"\nRW 128 SPARSE "s.vmdk"\n'
body = bytearray(header(0xFFFFFFFFFFFFFFFF) + desc.ljust(1024, b"\0"))
g_at = len(body) // 512
body += grain.ljust((len(grain) + 511) // 512 * 512, b"\0")
def marker(kind, sectors):
    m = bytearray(512); struct.pack_into("<QII", m, 0, sectors, 0, kind); return bytes(m)
gt_at = len(body) // 512 + 1
body += marker(1, 4) + struct.pack("<I", g_at).ljust(2048, b"\0")
gd_at = len(body) // 512 + 1
body += marker(2, 1) + struct.pack("<I", gt_at).ljust(512, b"\0")
body += marker(3, 1) + header(gd_at) + bytes(512)
open(os.path.join(out, "vmware-stream"), "wb").write(bytes(body))
# Descriptors followed (after a NUL, at the next sector) by the extent every name
# resolves to in the target: a COWD extent (16 sectors, grain 8, one grain of 0x77), and
# an SESparse extent (constant header, volatile header, one grain table, one grain).
c = bytearray(4096)
c[0:4] = b"COWD"
struct.pack_into("<IIIIIII", c, 4, 1, 3, 16, 8, 4, 1, 7)
struct.pack_into("<I", c, 4 * 512, 5)
struct.pack_into("<I", c, 5 * 512, 6)
c[6 * 512: 7 * 512] = b"\x77" * 512
d = b'# Disk DescriptorFile\nversion=1\nCID=2\nparentCID=ffffffff\ncreateType="vmfsSparse"\nRW 16 VMFSSPARSE "x.vmdk"\nRW 8 ZERO\nRDONLY 4 FLAT "y" 0\n'
open(os.path.join(out, "cowd"), "wb").write(d.ljust(512, b"\0") + bytes(c))
s = bytearray(2 * 512 + 8 * 512 + 32768 + 4096)
struct.pack_into("<QQQQQQ", s, 0, 0xCAFEBABE, 0x200000001, 64, 8, 64, 0)
# volatile header at sector 1; GD at sector 2 (1 sector); GTs at 3; grains at 67
struct.pack_into("<QQQQQQQQQQ", s, 80, 1, 1, 0, 0, 0, 0, 2, 1, 3, 64)
struct.pack_into("<QQQQQQ", s, 160, 0, 0, 0, 0, 67, 8)
struct.pack_into("<Q", s, 512, 0xCAFECAFE)
struct.pack_into("<Q", s, 1024, 0x1000000000000000)
struct.pack_into("<QQ", s, 3 * 512, 0x3000000000000000, 0x2000000000000000)
s[67 * 512: 68 * 512] = b"\x42" * 512
d = b'# Disk DescriptorFile\nversion=1\nCID=3\nparentCID=ffffffff\ncreateType="seSparse"\nRW 64 SESPARSE "x-sesparse.vmdk"\n'
open(os.path.join(out, "sesparse"), "wb").write(d.ljust(512, b"\0") + bytes(s))
PY
echo "make-corpus.sh: $(ls "$vmdk" | wc -l) images in $vmdk"

# vdi_open_read: qemu-img's empty dynamic image and one with a block written (blocks are
# always 1 MiB, so seeds with data are that large).
vdi=corpus/vdi_open_read
mkdir -p "$vdi"
qemu-img create -q -f vdi "$work/empty.vdi" 3M
qemu-img create -q -f vdi "$work/data.vdi" 3M
qemu-io -f vdi -c 'write -P 0x5a 2M 4k' "$work/data.vdi" >/dev/null
for f in empty data; do
    cp "$work/$f.vdi" "$vdi/$f"
done
echo "make-corpus.sh: $(ls "$vdi" | wc -l) images in $vdi"

# qed_open_read: qemu-img's QED images: empty with the defaults (64 KiB clusters, 320 KiB),
# 4 KiB clusters with data and zero clusters (write -z), two-cluster tables (4 MiB per L2
# table) with data under two L1 entries, one naming a raw backing file (written through it),
# and a copy of one with the need-check bit set (a writable open repairs it first).
qed=corpus/qed_open_read
mkdir -p "$qed"
qio() { local f=$1; shift; local args=(); for c in "$@"; do args+=(-c "$c"); done; qemu-io -f qed "${args[@]}" "$f" >/dev/null; }
qemu-img create -q -f qed "$work/empty.qed" 1M
qemu-img create -q -f qed -o cluster_size=4k "$work/c4k.qed" 2M
qio "$work/c4k.qed" 'write -P 0x11 0 6k' 'write -z 8k 8k' 'write -P 0x22 1M 4k' 'write -z 1536k 512'
qemu-img create -q -f qed -o cluster_size=4k,table_size=2 "$work/t2.qed" 8M
qio "$work/t2.qed" 'write -P 0x33 0 4k' 'write -z 4k 4k' 'write -P 0x44 4M 8k' 'write -P 0x55 7M 512'
qemu-img create -q -f raw "$work/qedbase.raw" 256K
qemu-io -f raw -c 'write -P 0x66 0 64k' "$work/qedbase.raw" >/dev/null
qemu-img create -q -f qed -o cluster_size=4k -b qedbase.raw -F raw "$work/backed.qed" 256K
qio "$work/backed.qed" 'write -P 0x77 4k 1k' 'write -z 64k 4k'
for f in empty c4k t2 backed; do
    cp "$work/$f.qed" "$qed/$f"
done
python3 - "$qed/t2" "$qed/need-check" <<'PY'
import struct, sys
b = bytearray(open(sys.argv[1], "rb").read())
struct.pack_into("<Q", b, 16, struct.unpack_from("<Q", b, 16)[0] | 2)
open(sys.argv[2], "wb").write(b)
PY
echo "make-corpus.sh: $(ls "$qed" | wc -l) images in $qed"

# qcow1_open_read: qemu-img's qcow (version 1) images, plain, compressed (from a sparse
# source: qemu-img's compressed qcow writer needs one) and naming a backing file.
q1=corpus/qcow1_open_read
mkdir -p "$q1"
truncate -s 64K "$work/q1src.raw"
printf 'qcow one, compressible text %.0s' $(seq 200) | dd of="$work/q1src.raw" conv=notrunc status=none
qemu-img convert -f raw -O qcow "$work/q1src.raw" "$work/q1plain.qcow"
qemu-img convert -c -f raw -O qcow "$work/q1src.raw" "$work/q1packed.qcow" || true
qemu-img create -q -f qcow -b q1plain.qcow -F qcow "$work/q1top.qcow"
for f in q1plain q1packed q1top; do
    cp "$work/$f.qcow" "$q1/$f"
done
echo "make-corpus.sh: $(ls "$q1" | wc -l) images in $q1"

# bochs_open_read and cloop_open_read: images written here from the formats' layouts
# (qemu-img cannot write either): a version 2 and a version 1 Bochs image with some
# extents and sectors present, and a cloop image of three zlib blocks.
mkdir -p corpus/bochs_open_read corpus/cloop_open_read
python3 - corpus/bochs_open_read corpus/cloop_open_read <<'PY'
import os, struct, sys, zlib
bochs_dir, cloop_dir = sys.argv[1], sys.argv[2]
def bochs(version):
    extent, extents = 4096, 6
    h = bytearray(512)
    h[0:22] = b"Bochs Virtual HD Image"; h[32:39] = b"Redolog"; h[48:55] = b"Growing"
    struct.pack_into("<IIIII", h, 64, version << 16, 512, extents, 512, extent)
    struct.pack_into("<Q", h, 84 if version == 1 else 88, extents * extent - 1024)
    catalog = [0xffffffff] * extents
    catalog[1], catalog[4] = 0, 1
    body = bytes(h) + struct.pack("<%dI" % extents, *catalog)
    for n in range(2):
        bitmap = bytearray(512); bitmap[0] = 0xa5; bitmap[1] = 0x0f
        body += bytes(bitmap) + bytes([0x30 + n]) * extent
    return body
open(os.path.join(bochs_dir, "v2"), "wb").write(bochs(2))
open(os.path.join(bochs_dir, "v1"), "wb").write(bochs(1))
script = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
block = 4096
blocks = [zlib.compress(bytes([i * 40]) * block) for i in range(3)]
offsets = [136 + 8 * 4]
for b in blocks:
    offsets.append(offsets[-1] + len(b))
img = script.ljust(128, b"\0") + struct.pack(">II", block, 3) + struct.pack(">4Q", *offsets)
img += b"".join(blocks)
open(os.path.join(cloop_dir, "three"), "wb").write(img)
PY
echo "make-corpus.sh: $(ls corpus/bochs_open_read | wc -l) images in corpus/bochs_open_read, $(ls corpus/cloop_open_read | wc -l) in corpus/cloop_open_read"

# vhdx_open_read: the target patches its own 8 MiB template; seeds are patch lists: none,
# a header with a log GUID (resealed), and a log entry at the log's start naming it (the
# entry resealed too: a replay), with the writable pass.
mkdir -p corpus/vhdx_open_read
python3 - corpus/vhdx_open_read <<'PY'
import os, struct, sys
out = sys.argv[1]
def rec(area, off, data):
    return bytes([area]) + struct.pack("<HB", off, len(data)) + data
guid = bytes(range(1, 17))
open(os.path.join(out, "template"), "wb").write(b"\0")
logged = bytes([1 | 4 | 8]) + rec(1, 48, guid) + rec(2, 48, guid)
entry = b"loge" + b"\0" * 4 + struct.pack("<IIQI", 8192, 0, 1, 1) + b"\0" * 4 + guid
entry += struct.pack("<QQ", 8 << 20, 8 << 20)
desc = b"desc" + b"\0" * 4 + struct.pack("<QQQ", 6 | (8 << 20), 2 << 20, 1)
data = b"data" + struct.pack("<I", 0)
logged_entry = logged + rec(4, 0, entry) + rec(4, 64, desc) + rec(4, 4096, data) + rec(4, 8188, struct.pack("<I", 1))
open(os.path.join(out, "log-guid"), "wb").write(logged)
open(os.path.join(out, "log-entry"), "wb").write(logged_entry)
PY
echo "make-corpus.sh: $(ls corpus/vhdx_open_read | wc -l) seeds in corpus/vhdx_open_read"

# parallels_open_read: qemu-img's Parallels images (4 KiB clusters with data, a cluster
# released by a zero write and a partial one; 64 KiB clusters; 512-byte clusters with a
# discard; an empty one), and, made here from the 4 KiB one, a copy left in use (inuse set,
# a leaked tail) and one with a duplicate BAT entry (a writable open repairs both), and an
# image with the original magic ("WithoutFreeSpace": 63-sector clusters, the BAT in
# sectors, data offset 0), which qemu-img cannot create.
par=corpus/parallels_open_read
mkdir -p "$par"
pio() { local f=$1; shift; local args=(); for c in "$@"; do args+=(-c "$c"); done; qemu-io -f parallels "${args[@]}" "$f" >/dev/null; }
qemu-img create -q -f parallels -o cluster_size=4k "$work/p4k.hdd" 1M
pio "$work/p4k.hdd" 'write -P 0x11 0 6k' 'write -P 0x22 512k 4k' 'write -z 0 4k' 'write -P 0x33 900k 512'
qemu-img create -q -f parallels -o cluster_size=64k "$work/p64k.hdd" 2M
pio "$work/p64k.hdd" 'write -P 0x44 0 64k' 'write -P 0x55 1M 100k'
qemu-img create -q -f parallels -o cluster_size=512 "$work/p512.hdd" 256K
pio "$work/p512.hdd" 'write -P 0x66 1k 3k' 'discard 1k 512'
qemu-img create -q -f parallels -o cluster_size=4k "$work/pempty.hdd" 64K
for f in p4k p64k p512 pempty; do
    cp "$work/$f.hdd" "$par/$f"
done
python3 - "$par" <<'PY'
import os, struct, sys
out = sys.argv[1]
base = open(os.path.join(out, "p4k"), "rb").read()
crashed = bytearray(base)
struct.pack_into("<I", crashed, 44, 0x746F6E59)
open(os.path.join(out, "in-use"), "wb").write(bytes(crashed) + b"\xee" * 4096)
dup = bytearray(base)
entries = struct.unpack_from("<256I", dup, 64)
struct.pack_into("<I", dup, 64 + 4 * 7, next(e for e in entries if e))
open(os.path.join(out, "duplicate"), "wb").write(dup)
old = bytearray(127 * 512)
old[0:16] = b"WithoutFreeSpace"
# version, heads, cylinders, tracks, BAT entries, sectors, inuse, data_off, flags, ext_off
struct.pack_into("<IIIIIQIIIQ", old, 16, 2, 16, 1, 63, 16, 16 * 63, 0, 0, 0, 0)
struct.pack_into("<III", old, 64, 1, 0, 64)
old[512:64 * 512] = b"\xa1" * (63 * 512)
old[64 * 512:127 * 512] = b"\xa2" * (63 * 512)
open(os.path.join(out, "old-magic"), "wb").write(old)
PY
echo "make-corpus.sh: $(ls "$par" | wc -l) images in $par"

# dmg_open_read: DMG images written here (qemu-img cannot write DMG): a koly trailer, mish
# tables in an XML property list (base64 <data>) or in a resource fork, chunks of every type
# QEMU reads (raw, zero, ignore, zlib, bzip2, LZFSE as one uncompressed "bvx-" block), comments
# and terminators, two tables, a short raw chunk.
dmg=corpus/dmg_open_read
mkdir -p "$dmg"
python3 - "$dmg" <<'PY'
import base64, bz2, os, struct, sys, zlib
out = sys.argv[1]
RAW, ZERO, IGNORE, ZLIB, BZ2, LZFSE, COMMENT, END = 1, 0, 2, 0x80000005, 0x80000006, 0x80000007, 0x7FFFFFFE, 0xFFFFFFFF
def pattern(sectors, seed):
    return bytes((i * 7 + seed) % 251 if i % 5 < 3 else (i // 512) & 0xFF for i in range(sectors * 512))
def lzfse_raw(data):
    return b"bvx-" + struct.pack("<I", len(data)) + data + b"bvx$"
def mish(first, data_offset, entries):
    sectors = sum(e[2] for e in entries)
    h = struct.pack(">4sIQQQII", b"mish", 1, first, sectors, data_offset, 0x208, 0)
    h += bytes(24) + struct.pack(">II", 2, 32) + bytes(128) + struct.pack(">I", len(entries))
    return h + b"".join(struct.pack(">IIQQQQ", ty, 0, s, n, off, ln) for ty, s, n, off, ln in entries)
def image(tables, rsrc):
    # tables: lists of (type, sectors, stored bytes); each table's data follows the last.
    fork, blobs, first = b"", [], 0
    for chunks in tables:
        data_offset, sector, entries = len(fork), 0, []
        for ty, count, stored in chunks:
            entries.append((ty, sector, count, len(fork) - data_offset, len(stored)))
            fork += stored
            sector += count
        entries.append((END, sector, 0, len(fork) - data_offset, 0))
        blobs.append(mish(first, data_offset, entries))
        first += sector
    if rsrc:
        data = b"".join(struct.pack(">I", len(b)) + b for b in blobs)
        fork_tables = struct.pack(">IIII", 256, 256 + len(data), len(data), 30).ljust(256, b"\0") + data + bytes(30)
    else:
        items = ""
        for b in blobs:
            t = base64.b64encode(b).decode()
            items += "\t\t\t<dict>\n\t\t\t\t<key>Data</key>\n\t\t\t\t<data>\n" + "\n".join(t[i:i + 52] for i in range(0, len(t), 52)) + "\n\t\t\t\t</data>\n\t\t\t</dict>\n"
        fork_tables = ('<?xml version="1.0" encoding="UTF-8"?>\n<plist version="1.0">\n<dict>\n\t<key>resource-fork</key>\n\t<dict>\n\t\t<key>blkx</key>\n\t\t<array>\n'
                       + items + "\t\t</array>\n\t</dict>\n</dict>\n</plist>\n").encode()
    k = bytearray(512)
    struct.pack_into(">4sIII", k, 0, b"koly", 4, 512, 1)
    struct.pack_into(">QQ", k, 0x18, 0, len(fork))
    struct.pack_into(">QQ", k, 0x28 if rsrc else 0xD8, len(fork), len(fork_tables))
    struct.pack_into(">I", k, 0x1E8, 1)
    struct.pack_into(">Q", k, 0x1EC, first)
    return fork + fork_tables + bytes(k)
mixed = [(RAW, 2, pattern(2, 1)), (ZERO, 3, b""), (ZLIB, 8, zlib.compress(pattern(8, 2))), (COMMENT, 0, b""),
         (RAW, 1, pattern(1, 3)), (IGNORE, 2, b"")]
seeds = {
    "xml": image([mixed], False),
    "rsrc": image([mixed], True),
    "bzip2-lzfse": image([[(BZ2, 8, bz2.compress(pattern(8, 4))), (LZFSE, 4, lzfse_raw(pattern(4, 5))), (ZLIB, 4, zlib.compress(bytes(2048)))]], False),
    "two-tables": image([[(RAW, 1, pattern(1, 6)), (ZERO, 7, b"")], [(ZLIB, 16, zlib.compress(pattern(16, 7))), (RAW, 2, pattern(2, 8)[:700])]], True),
}
for name, data in seeds.items():
    open(os.path.join(out, name), "wb").write(data)
PY
echo "make-corpus.sh: $(ls "$dmg" | wc -l) images in $dmg"

#!/bin/bash
# Per-packet cost of two pfwd builds' tc programs, side by side: A=<pfwd binary> B=<pfwd binary> ab_test_run.sh
#
# Each build is attached (eBPF mode) to lo in a namespace of its own, with the two DNAT rules of the bench's
# BPF_PROG_TEST_RUN cases, and its flows are created; then `bpftool prog run ... repeat 2000000` runs alternate
# between the builds, ROUNDS (default 9) times per case, on CPU 1, and the medians and their ratio B/A are printed.
# This is how the IPv4 cost before and after IPv6 was compared (README, Benchmarks). Run as root; the namespaces and
# both instances are removed on exit, also on failure.
set -uo pipefail
: "${A:?A: the first pfwd binary}" "${B:?B: the second pfwd binary}"
PKTS=$(mktemp -d)
python3 "$(dirname "$0")/ab_packets.py" "$PKTS"

cleanup() {
    nsenter --net=/run/netns/pfwd-abA "$A" detach >/dev/null 2>&1
    nsenter --net=/run/netns/pfwd-abB "$B" detach >/dev/null 2>&1
    ip netns del pfwd-abA 2>/dev/null
    ip netns del pfwd-abB 2>/dev/null
    rm -rf "$PKTS"
}
trap cleanup EXIT

# $1: pfwd binary, $2: namespace. Prints the instance's pin directory.
setup() {
    ip netns add "$2" || exit 1
    local N="nsenter --net=/run/netns/$2"
    $N ip link set lo up
    $N "$1" attach lo --mode ebpf >/dev/null 2>&1 || { echo "attach failed ($1)" >&2; exit 1; }
    $N "$1" add dnat -i lo -p udp -d 10.0.1.1 --dport 9000 --to 10.0.2.2:9000 >/dev/null 2>&1
    $N "$1" add dnat -i lo -p udp -d 10.0.2.2 --dport 9000 --to 10.0.1.1:9000 >/dev/null 2>&1
    local D
    D=/sys/fs/bpf/pfwd/net-$($N stat -L -c %i /proc/self/ns/net)
    # Flows A and B, confirmed by a reply each (as the bench does).
    for p in "ingress a" "ingress b" "egress reply" "egress reply2"; do
        set -- $p
        $N bpftool prog run pinned "$D/prog_$1" data_in "$PKTS/$2.bin" data_out /dev/null repeat 1 >/dev/null
    done
    echo "$D"
}

# $1: namespace, $2: program pin, $3: packet, $4: repeat. Prints ns per run.
run() {
    nsenter --net=/run/netns/"$1" taskset -c 1 bpftool prog run pinned "$2" data_in "$PKTS/$3.bin" \
        data_out /dev/null repeat "$4" 2>&1 | grep -o "duration (average): [0-9]*" | grep -o "[0-9]*$"
}

median() { sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }

DA=$(setup "$A" pfwd-abA) || exit 1
DB=$(setup "$B" pfwd-abB) || exit 1
for case in "ingress norule 2000000 no-rule" "ingress a 2000001 established" "egress reply 2000001 reply"; do
    set -- $case
    a=() b=()
    for _ in $(seq 1 "${ROUNDS:-9}"); do
        a+=("$(run pfwd-abA "$DA/prog_$1" "$2" "$3")")
        b+=("$(run pfwd-abB "$DB/prog_$1" "$2" "$3")")
    done
    ma=$(printf "%s\n" "${a[@]}" | median)
    mb=$(printf "%s\n" "${b[@]}" | median)
    echo "$4: A ${a[*]} | B ${b[*]} | medians $ma $mb ns, B/A $(echo "scale=2; $mb/$ma" | bc)"
done

//! Builds the eBPF programs (`pfwd-ebpf`, for bpfel-unknown-none with the nightly toolchain and bpf-linker) and puts
//! the object in OUT_DIR, where `loader.rs` embeds it: the `pfwd` binary is self-contained.
fn main() -> anyhow::Result<()> {
    let ebpf_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../pfwd-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package { name: "pfwd-ebpf", root_dir: ebpf_dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}

// mimalloc, not glibc's malloc: an import of 10,000 rules makes about 300,000 small allocations, and with glibc
// they were a tenth of its instructions (see the README's library list).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // No transparent huge pages for pfwd: mimalloc asks for them on its arenas (MADV_HUGEPAGE), and the first touch
    // of each 2 MB then had the kernel clear all of it. That was over half of an import of 10,000 rules (a profile:
    // clear_page_erms under mimalloc's page faults), and on a busy host it took 0.5 s instead of a few tens of ms.
    // 4 KB pages are cleared only where touched. Failure only leaves the default.
    // SAFETY: prctl with integer arguments, no pointers.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    pfwd::cli::main()
}

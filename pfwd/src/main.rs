// mimalloc, not glibc's malloc: an import of 10,000 rules makes about 300,000 small allocations, and with glibc
// they were a tenth of its instructions (see the README's library list).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    pfwd::cli::main()
}

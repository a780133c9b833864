fn main() -> std::process::ExitCode {
    pfwd::cli::main()
}

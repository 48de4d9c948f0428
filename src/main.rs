fn main() -> std::process::ExitCode {
    keybroker::cli::main()
}

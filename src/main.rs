/// mimalloc instead of glibc's malloc: every request allocates and frees small buffers across
/// threads, and glibc's malloc and free were 10-15% of a request's CPU (BENCHMARKS.md, issue 20).
/// Its arenas are committed as they are used (`.cargo/config.toml`), which keeps the peak RSS
/// near glibc's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    keybroker::cli::main()
}

//! `sandboxd`: one binary, the daemon (`serve`) and its admin CLI.

// The proxies allocate and free small buffers (headers, TLS records) for
// every request, from one thread per core; mimalloc's per-thread free lists
// serve that pattern with less CPU than the C library's allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    sandboxd::cli::main()
}

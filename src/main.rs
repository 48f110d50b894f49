//! `sandboxd`: one binary, the daemon (`serve`) and its admin CLI.

fn main() -> std::process::ExitCode {
    sandboxd::cli::main()
}

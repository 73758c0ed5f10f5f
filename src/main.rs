use std::process::ExitCode;

fn main() -> ExitCode {
    hypura::cli::main()
}

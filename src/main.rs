//! The `prism` command line (`prism --help`); the commands live in the library's `cli` module.

fn main() -> std::process::ExitCode {
    prism::cli::main()
}

//! The `vmm` command-line program.

fn main() {
    eprintln!("vmm: not built yet");
    std::process::exit(2);
}

use clap::Parser;
use onnx_compress::cli::{run, Cli};

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        // One line: the whole cause chain, outermost first.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

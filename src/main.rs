use clap::Parser;
use onnx_compress::cli::{run, Cli};

fn main() {
    // Behave like a Unix tool when piped into `head`: end quietly instead of panicking on
    // a closed stdout.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        // One line: the whole cause chain, outermost first.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

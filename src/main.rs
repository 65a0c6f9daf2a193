//! The `onnx-compress` binary: the command line over the library.

mod cli;

fn main() {
    // Behave like a Unix tool when piped into `head`: end quietly instead of panicking on
    // a closed stdout.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Tract runs allocate and free their activations over and over: keep the freed memory.
    onnx_compress::runtime::allocator::keep_freed_memory();
    if let Err(e) = cli::main_with_args(std::env::args_os().collect()) {
        // One line: the whole cause chain, outermost first.
        eprintln!("error: {}", cli::error_line(&e));
        std::process::exit(1);
    }
}

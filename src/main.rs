//! The `encimg` binary: parse arguments, run, and turn errors into one line and an exit code.

use clap::Parser;

fn main() {
    // Before anything else, and before any thread exists: no core dumps or ptrace of a
    // process that holds keys, and the passphrase out of the environment.
    encimg::sys::secret::harden_process();
    encimg::sys::tune_allocator();
    let passphrase = encimg::sys::secret::take_passphrase();
    // A variable set empty means "not set" (the default store, the local region), as for
    // XDG_DATA_HOME; clap would take it for a missing value. No thread exists yet.
    for v in ["ENCIMG_STORE", "ENCIMG_REGION"] {
        if std::env::var_os(v).is_some_and(|x| x.is_empty()) {
            std::env::remove_var(v);
        }
    }
    // Never a backtrace: an internal error is one line and exit code 70.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        // Not eprintln!, which panics when stderr cannot be written (a daemon's log on a
        // full disk), and a panic in the panic hook aborts.
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "encimg: internal error: {msg}");
        std::process::exit(70);
    }));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ENCIMG_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,cryptoki=off")),
        )
        .with_writer(std::io::stderr)
        // The daemon's stderr becomes mount.log: no terminal colour codes in it.
        .with_ansi(false)
        // A line that cannot be written (mount.log on a full disk) is lost, nothing more:
        // reporting it would eprintln!, which panics when stderr fails.
        .log_internal_errors(false)
        .init();
    let cli = match encimg::cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            std::process::exit(0);
        }
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("encimg: error: {first} (see --help)");
            std::process::exit(2);
        }
    };
    if !matches!(cli.command, encimg::cli::Command::Mount(_)) {
        // Output into a closed pipe (`encimg key list | head -1`) ends the command quietly,
        // as with other Unix tools, instead of failing on the write. The mount daemon keeps
        // ignoring SIGPIPE: it must outlive whatever its output went to.
        // SAFETY: restoring a signal's default disposition at startup, before any threads.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    if let Err(e) = passphrase.and_then(|()| encimg::cli::run(cli)) {
        eprintln!("encimg: error: {e}");
        std::process::exit(e.kind.exit_code());
    }
}

//! podnet: the CNI plugin binary. A runtime runs it with the CNI_*
//! environment and the network configuration on stdin; it does one job,
//! prints the result (or a CNI error) on stdout and exits.

use std::{
    io::{Read as _, Write as _},
    path::Path,
    process::ExitCode,
};

use podnet::{
    api::Client,
    cni::{
        CniError,
        config::sniff_version,
        env::CniEnv,
        error::code,
        plugin::{self, AgentApi, Deps},
        plumbing::NetlinkPlumbing,
        version,
    },
};

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let error_version = sniff_version(&stdin).unwrap_or_else(|| version::CURRENT.to_owned());
    let outcome = read
        .map_err(|e| {
            CniError::new(
                code::IO_FAILURE,
                "reading the network configuration from stdin",
            )
            .with_details(e.to_string())
        })
        .and_then(|_| CniEnv::from_vars(|k| std::env::var(k).ok()))
        .and_then(|env| {
            let agent = |socket: &Path| -> Box<dyn AgentApi> { Box::new(Client::new(socket)) };
            let deps = Deps {
                plumbing: &NetlinkPlumbing,
                agent: &agent,
            };
            plugin::run(&env, &stdin, &deps)
        });
    let mut stdout = std::io::stdout().lock();
    match outcome {
        Ok(Some(output)) => {
            let _ = writeln!(stdout, "{output}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(stdout, "{}", e.to_json(&error_version));
            let _ = writeln!(std::io::stderr(), "podnet: {e}");
            ExitCode::FAILURE
        }
    }
}

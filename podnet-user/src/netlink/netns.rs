//! Running netlink work inside a network namespace, on a thread of its own.

use std::{fs::File, future::Future, path::Path};

use rtnetlink::Handle;

use super::NetlinkError;

/// Runs `work` with a netlink handle inside `netns` (a path such as
/// `/var/run/netns/x` or `/proc/PID/ns/net`; `None`: the caller's netns), on a
/// dedicated thread, and waits for it.
pub fn with_netlink<T, F, Fut>(netns: Option<&Path>, work: F) -> Result<T, NetlinkError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetlinkError>>,
{
    let netns_file = netns
        .map(|path| {
            File::open(path)
                .map(|f| (f, path.to_owned()))
                .map_err(|source| NetlinkError::OpenNetns {
                    path: path.to_owned(),
                    source,
                })
        })
        .transpose()?;
    let worker = std::thread::spawn(move || -> Result<T, NetlinkError> {
        if let Some((file, path)) = &netns_file {
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|source| {
                NetlinkError::EnterNetns {
                    path: path.clone(),
                    source,
                }
            })?;
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(NetlinkError::Runtime)?;
        runtime.block_on(async move {
            // The socket is created after setns, so it belongs to that netns.
            let (connection, handle, _) =
                rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
            tokio::spawn(connection);
            work(handle).await
        })
    });
    worker.join().map_err(|_| NetlinkError::WorkerPanicked)?
}

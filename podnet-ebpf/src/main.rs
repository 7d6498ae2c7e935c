//! podnet's eBPF datapath: TC programs, and the socket LB's cgroup
//! `sock_addr` programs. One module per attach point; shared packet
//! access, maps and counters in their own modules.
#![no_std]
#![no_main]

mod arp;
mod clock;
mod counters;
mod events;
mod flows;
mod forward;
mod from_overlay;
mod from_pod;
mod from_underlay;
mod l4;
mod lookup;
mod maps;
mod node_port;
mod packet;
mod policy;
mod sender;
mod service;
mod sock_connect4;
mod sock_peername4;
mod sock_recvmsg4;
mod sock_sendmsg4;
mod socket_lb;
mod to_overlay;
mod to_pod;
mod to_underlay;
mod verdict;
mod vxlan;

// The bpfel target has no unwinding; a panic cannot happen in verified code
// (the verifier rejects unbounded paths), but the symbol must exist. Gated so a
// host `cargo check -p podnet-ebpf` does not clash with std's handler.
#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

//! Traffic control: BPF filters on clsact, the tbf qdisc of a shaped
//! endpoint.

use futures::TryStreamExt as _;
use rtnetlink::{Handle, packet_route::tc::TcAttribute};

use super::{NetlinkError, request};

/// Whether link `index` has a `bpf` filter at `priority` on its clsact
/// ingress (`tc filter show dev X ingress`) or, with `egress`, its clsact
/// egress; `false` without a clsact qdisc.
pub async fn has_bpf_filter(
    handle: &Handle,
    index: u32,
    priority: u16,
    egress: bool,
) -> Result<bool, NetlinkError> {
    let Ok(ifindex) = i32::try_from(index) else {
        return Ok(false);
    };
    let get = handle.traffic_filter(ifindex).get();
    let get = if egress { get.egress() } else { get.ingress() };
    let mut filters = get.execute();
    loop {
        match filters.try_next().await {
            Ok(Some(msg)) => {
                // tcm_info carries the filter's priority in its upper half.
                let at_priority = msg.header.info >> 16 == u32::from(priority);
                let is_bpf = msg
                    .attributes
                    .iter()
                    .any(|a| matches!(a, TcAttribute::Kind(kind) if kind == "bpf"));
                if at_priority && is_bpf {
                    return Ok(true);
                }
            }
            Ok(None) => return Ok(false),
            // No clsact qdisc (EINVAL) or no such link (ENODEV): no filter.
            Err(rtnetlink::Error::NetlinkError(e))
                if e.code
                    .is_some_and(|c| [-libc::EINVAL, -libc::ENODEV].contains(&c.get())) =>
            {
                return Ok(false);
            }
            Err(source) => {
                return Err(request(format!(
                    "listing the {} filters of link #{index}",
                    if egress { "egress" } else { "ingress" }
                ))(source));
            }
        }
    }
}

/// `TCA_TBF_PARMS` / `TCA_TBF_RATE64` (linux/pkt_sched.h).
const TCA_TBF_PARMS: u16 = 1;
const TCA_TBF_RATE64: u16 = 4;

/// Puts a tbf qdisc with `tbf`'s parameters at the root of link `index`
/// (handle 1:, replacing what is there: the veth's default noqueue, or an
/// earlier tbf of the same endpoint).
pub async fn replace_root_tbf(
    handle: &Handle,
    index: u32,
    tbf: &crate::shaping::Tbf,
) -> Result<(), NetlinkError> {
    use rtnetlink::packet_core::{
        DefaultNla, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage,
        NetlinkPayload,
    };
    use rtnetlink::packet_route::{
        RouteNetlinkMessage,
        tc::{TcHandle, TcMessage, TcOption},
    };
    let action = format!("putting a tbf qdisc on link #{index}");
    let (qopt, rate64) = tbf.to_qopt();
    let mut options = vec![TcOption::Other(DefaultNla::new(
        TCA_TBF_PARMS,
        qopt.to_vec(),
    ))];
    if let Some(rate64) = rate64 {
        options.push(TcOption::Other(DefaultNla::new(
            TCA_TBF_RATE64,
            rate64.to_ne_bytes().to_vec(),
        )));
    }
    let mut message = TcMessage::default();
    message.header.index = i32::try_from(index)
        .map_err(|_| NetlinkError::Unexpected(format!("{action}: ifindex out of range")))?;
    message.header.handle = TcHandle { major: 1, minor: 0 };
    message.header.parent = TcHandle::ROOT;
    message.attributes.push(TcAttribute::Kind("tbf".to_owned()));
    message.attributes.push(TcAttribute::Options(options));
    let mut request_message =
        NetlinkMessage::from(RouteNetlinkMessage::NewQueueDiscipline(message));
    request_message.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    let mut responses = handle
        .clone()
        .request(request_message)
        .map_err(request(action.clone()))?;
    while let Some(response) = futures::StreamExt::next(&mut responses).await {
        if let NetlinkPayload::Error(e) = response.payload
            && e.code.is_some()
        {
            return Err(request(action)(rtnetlink::Error::NetlinkError(e)));
        }
    }
    Ok(())
}

/// The tbf qdisc at the root of link `index`, if the root qdisc is one.
pub async fn root_tbf(
    handle: &Handle,
    index: u32,
) -> Result<Option<crate::shaping::Tbf>, NetlinkError> {
    use rtnetlink::packet_core::{NlaBuffer, NlasIterator};
    use rtnetlink::packet_route::tc::{TcHandle, TcOption};
    let Ok(ifindex) = i32::try_from(index) else {
        return Ok(None);
    };
    let mut qdiscs = handle.qdisc().get().index(ifindex).execute();
    while let Some(msg) = qdiscs
        .try_next()
        .await
        .map_err(request(format!("listing the qdiscs of link #{index}")))?
    {
        if msg.header.index != ifindex || msg.header.parent != TcHandle::ROOT {
            continue;
        }
        let is_tbf = msg
            .attributes
            .iter()
            .any(|a| matches!(a, TcAttribute::Kind(kind) if kind == "tbf"));
        if !is_tbf {
            return Ok(None);
        }
        // netlink-packet-route keeps the options of a kind it does not know
        // as one raw attribute: the nested TCA_TBF_* attributes inside.
        let mut parms = None;
        let mut rate64 = None;
        for attribute in &msg.attributes {
            let TcAttribute::Options(options) = attribute else {
                continue;
            };
            for option in options {
                let TcOption::Other(raw) = option else {
                    continue;
                };
                let mut bytes = vec![0u8; rtnetlink::packet_core::Nla::value_len(raw)];
                rtnetlink::packet_core::Nla::emit_value(raw, &mut bytes);
                for nla in NlasIterator::new(bytes.as_slice()).flatten() {
                    let nla: NlaBuffer<&[u8]> = nla;
                    match nla.kind() {
                        TCA_TBF_PARMS => parms = Some(nla.value().to_vec()),
                        TCA_TBF_RATE64 => {
                            rate64 = nla.value().try_into().ok().map(u64::from_ne_bytes);
                        }
                        _ => {}
                    }
                }
            }
        }
        return Ok(parms.and_then(|p| crate::shaping::Tbf::from_qopt(&p, rate64)));
    }
    Ok(None)
}

//! The vmservice protocol (hcsshim's RemoteVM), generated at build time from
//! `proto/vmservice.proto`: messages in [`vmservice`], the ttrpc service
//! (client, server trait and registration) in [`vmservice_ttrpc`].

pub mod convert;

#[allow(missing_docs, clippy::all, clippy::pedantic, unused_qualifications)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/vmservice/protocol.rs"));
}
pub use generated::*;

/// The ttrpc service name, as every peer spells it.
pub const SERVICE: &str = "vmservice.VM";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_is_named_as_the_protocol_says() {
        let text = include_str!(concat!(env!("OUT_DIR"), "/vmservice/vmservice_ttrpc.rs"));
        assert!(text.contains(&format!("\"{SERVICE}\"")), "{text}");
        assert!(!text.contains("\"vmservice.Vm\""));
    }

    #[test]
    fn messages_round_trip_on_the_wire_with_the_reference_field_numbers() {
        use protobuf::Message;
        let mut disk = vmservice::SCSIDisk::new();
        disk.controller = 1;
        disk.lun = 2;
        disk.host_path = "/var/lib/uvmctl/d.img".into();
        disk.type_ = vmservice::DiskType::SCSI_DISK_TYPE_PHYSICAL.into();
        disk.read_only = true;
        let mut req = vmservice::ModifyResourceRequest::new();
        req.type_ = vmservice::ModifyType::ADD.into();
        req.set_scsi_disk(disk);
        let bytes = req.write_to_bytes().expect("encodes");
        // Field 5 (scsi_disk), length-delimited: tag 0x2a.
        assert_eq!(bytes[0], 0x2a, "{bytes:02x?}");
        let back = vmservice::ModifyResourceRequest::parse_from_bytes(&bytes).expect("decodes");
        assert_eq!(back, req);
    }
}

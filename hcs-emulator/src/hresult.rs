//! Every HRESULT the emulator returns, in one place.
//!
//! The `HCS_E_*` values are from `virtualization/api/hcs/Reference/HCSHResult.md` ("HCS Error
//! Code", facility 0x037). The `E_*` values and `HRESULT_FROM_WIN32` codes are the standard
//! winerror.h ones (the HCS reference uses their names without giving values).

pub type HRESULT = i32;

const fn hr(v: u32) -> HRESULT {
    v as i32
}

pub const S_OK: HRESULT = 0;
pub const E_NOTIMPL: HRESULT = hr(0x8000_4001);
pub const E_POINTER: HRESULT = hr(0x8000_4003);
pub const E_HANDLE: HRESULT = hr(0x8007_0006);
pub const E_INVALIDARG: HRESULT = hr(0x8007_0057);
/// HRESULT_FROM_WIN32(ERROR_FILE_NOT_FOUND)
pub const E_FILE_NOT_FOUND: HRESULT = hr(0x8007_0002);
/// HRESULT_FROM_WIN32(ERROR_PATH_NOT_FOUND)
pub const E_PATH_NOT_FOUND: HRESULT = hr(0x8007_0003);
/// HRESULT_FROM_WIN32(ERROR_INVALID_DATA)
pub const E_INVALID_DATA: HRESULT = hr(0x8007_000D);
/// HRESULT_FROM_WIN32(ERROR_FILE_EXISTS)
pub const E_FILE_EXISTS: HRESULT = hr(0x8007_0050);
/// HRESULT_FROM_WIN32(ERROR_ALREADY_EXISTS)
pub const E_ALREADY_EXISTS: HRESULT = hr(0x8007_00B7);
/// HRESULT_FROM_WIN32(ERROR_NOT_FOUND)
pub const E_NOT_FOUND: HRESULT = hr(0x8007_0490);
/// E_FAIL, for I/O failures of the emulator's own files.
pub const E_FAIL: HRESULT = hr(0x8000_4005);

pub const HCS_E_INVALID_STATE: HRESULT = hr(0x8037_0105);
pub const HCS_E_INVALID_JSON: HRESULT = hr(0x8037_010D);
pub const HCS_E_SYSTEM_NOT_FOUND: HRESULT = hr(0x8037_010E);
pub const HCS_E_SYSTEM_ALREADY_EXISTS: HRESULT = hr(0x8037_010F);
pub const HCS_E_SYSTEM_ALREADY_STOPPED: HRESULT = hr(0x8037_0110);
pub const HCS_E_OPERATION_NOT_STARTED: HRESULT = hr(0x8037_0115);
pub const HCS_E_OPERATION_ALREADY_STARTED: HRESULT = hr(0x8037_0116);
pub const HCS_E_OPERATION_PENDING: HRESULT = hr(0x8037_0117);
pub const HCS_E_OPERATION_TIMEOUT: HRESULT = hr(0x8037_0118);
pub const HCS_E_OPERATION_SYSTEM_CALLBACK_ALREADY_SET: HRESULT = hr(0x8037_0119);

/// An HCS failure: the HRESULT and the message that goes into the ResultError document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HcsError {
    pub hr: HRESULT,
    pub message: String,
}

impl HcsError {
    pub fn new(hr: HRESULT, message: impl Into<String>) -> Self {
        HcsError {
            hr,
            message: message.into(),
        }
    }

    /// The ResultError document (SchemaReference.md `#ResultError`).
    pub fn document(&self) -> String {
        serde_json::json!({ "Error": self.hr, "ErrorMessage": self.message }).to_string()
    }
}

pub type HcsResult<T> = Result<T, HcsError>;

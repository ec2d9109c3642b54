//! The loop against the in-memory virtstack.

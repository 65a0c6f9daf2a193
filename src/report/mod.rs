//! What a run tells the user: model statistics and summaries.
pub mod gate;
pub mod html;
pub mod plots;
pub mod progress;
pub mod stats;

//! What a run tells the user: model statistics and summaries.
pub mod html;
pub mod plots;
pub mod stats;

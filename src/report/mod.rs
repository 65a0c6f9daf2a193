//! What a run tells the user: model statistics and summaries.
pub mod stats;
pub mod html;
pub mod plots;

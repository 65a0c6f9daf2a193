//! What a run tells the user, rendered from what it is given: the HTML page ([`html`]) and its
//! charts ([`plots`]). Nothing here runs a model or a pass.
pub mod html;
pub mod plots;

//! The one place keybroker's outbound HTTP clients (Octopus, JWKS, webhooks) are built: none
//! follows a redirect, so a credential, a login body or a session cookie is only ever sent to the
//! host it was configured for, and each trusts the section's `ca_file` besides the public roots.

/// A client builder with redirects off and `ca_certificates` trusted.
pub fn client_builder(ca_certificates: &[reqwest::Certificate]) -> reqwest::ClientBuilder {
    let builder = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none());
    ca_certificates.iter().cloned().fold(builder, reqwest::ClientBuilder::add_root_certificate)
}

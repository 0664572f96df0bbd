"""DNS set-up checks for a sending domain: MX, SPF, DKIM, DMARC, PTR, MTA-STS, TLS-RPT."""

"""Route tables: pick a virtual host by authority, then the first route whose match fits."""

"""Three fixes to the theme stack, loaded by _config.yml (sphinx: local_extensions). Without the first two every
page logs a JavaScript error in a fresh browser, which `make check-site` rightly reports; without the third the
single-page build (`make pdf`) stops.

- sphinx-thebe adds its inline configuration script twice under Sphinx 7 (`const THEBE_JS_URL` is then
  declared twice: SyntaxError). Identical scripts are kept once.
- pydata-sphinx-theme logs "Got invalid theme mode" on a reader's first visit unless a default mode is set.
  The book's figures are drawn on white, so the default is light (readers can still switch).
- Node visitors registered for the "html" builder only (myst-nb's hidden-code-cell node) are not found by the
  "singlehtml" builder once any extension registers a visitor under that name. They are copied over.
"""


def _page_context(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files", [])
    seen, unique = set(), []
    for script in scripts:
        # An inline script's filename is None or "" depending on who added it.
        key = (getattr(script, "filename", script) or "", repr(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique  # in place: it is the builder's own list, which later handlers still append to
    context.setdefault("default_mode", "light")


def _share_html_visitors(app):
    handlers = app.registry.translation_handlers
    if app.builder.format == "html" and app.builder.name != "html" and app.builder.name in handlers:
        for node, visitors in handlers.get("html", {}).items():
            handlers[app.builder.name].setdefault(node, visitors)


def setup(app):
    app.connect("builder-inited", _share_html_visitors)
    # Early: html-page-context stops at the first handler that returns a template name.
    app.connect("html-page-context", _page_context, priority=100)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

"""`sdprep review`: a local web page to look at, fix and approve a dataset.

- index.py: what the page shows of each image (caption, size, mask, monochrome label, problems),
  filters and tag counts; read from the files, refreshed after each write.
- edits.py: every change the page makes, each one journalled operation (`sdprep undo` reverses it)
  holding the dataset lock only while it writes.
- thumbs.py: thumbnails made on demand and cached in `.sdprep/thumbs/`.
- server.py: the Starlette app (token in every request, loopback only by default) and its uvicorn
  runner; static/ holds the page (plain HTML, CSS and JavaScript, no CDN).
"""

"""Stage 3: class-balanced sampling and FID / sFID / IS / precision / recall."""

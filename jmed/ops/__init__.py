"""Array-only kernels (no ``Image``): interpolation, B-splines, filters, k-space, crop/pad, histograms, labels, noise."""

"""From label maps and images to DICOM results: metrics, reference standard, SEG, SR, summary."""

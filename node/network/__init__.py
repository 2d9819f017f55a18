"""DICOM networking: the storage SCP that receives studies (with its TLS and the checks made
before an instance is acknowledged) and the SCU that delivers results."""

"""Style retrieval: artist galleries (enroll artists without retraining), Faiss search and retrieval metrics."""

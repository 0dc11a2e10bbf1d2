/* An app's own MPI_Abort, recorded before the MPI library ends the job.
 *
 * MPI_Abort does not return and runs no exit handler (Open MPI leaves with _exit), so a
 * rank that calls it would vanish from its run file without a word. This library is loaded
 * as an MPI profiling library (mpi4py.profile: RTLD_GLOBAL, before mpi4py loads MPI), so
 * its MPI_Abort is the one every caller in the rank reaches. It calls
 * mckmpi.endings.mpi_abort_called(errorcode), which records the rank's ending and flushes
 * its data when the harness asked for it, then the library's own PMPI_Abort.
 *
 * It is also an (empty) extension module, so that it is built and installed with mckmpi.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <mpi.h>

int MPI_Abort(MPI_Comm comm, int errorcode)
{
    if (Py_IsInitialized()) {
        PyGILState_STATE state = PyGILState_Ensure();
        PyObject *type, *value, *traceback;
        PyErr_Fetch(&type, &value, &traceback);
        PyObject *module = PyImport_ImportModule("mckmpi.endings");
        PyObject *result = module == NULL ? NULL
            : PyObject_CallMethod(module, "mpi_abort_called", "i", errorcode);
        if (result == NULL)
            PyErr_Clear(); /* the job ends anyway: the abort must happen */
        Py_XDECREF(result);
        Py_XDECREF(module);
        PyErr_Restore(type, value, traceback);
        PyGILState_Release(state);
    }
    return PMPI_Abort(comm, errorcode);
}

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_mpiabort",
    "MPI_Abort wrapper loaded as an MPI profiling library (see mckmpi.endings).", -1, NULL,
};

PyMODINIT_FUNC PyInit__mpiabort(void)
{
    return PyModule_Create(&module_def);
}

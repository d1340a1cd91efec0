/* dump Dragonfly's quaternion list for num_div (quat_gen of src/quat.c): num_rot lines "q0 q1 q2 q3 weight" */
#include "quat.h"
int main(int argc, char **argv) {
	struct rotation q ;
	memset(&q, 0, sizeof(q)) ;
	int n = quat_gen(atoi(argv[1]), &q) ;
	FILE *fp = fopen(argv[2], "wb") ;
	fwrite(q.quat, sizeof(double), 5 * (size_t) n, fp) ;
	fclose(fp) ;
	fprintf(stderr, "%d rotations\n", n) ;
	return 0 ;
}
